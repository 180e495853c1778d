"""``POST /api/v1/ingest``: what a station sends (checked), and storing it in one transaction.

Idempotent: an event whose id the station sent before is counted as a duplicate and changes
nothing (``INSERT ... ON CONFLICT DO NOTHING``); only the events that are new update the
files, the flights and the station. The contract is in docs/hub.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skyframe.config import format_key
from skyframe.hub.commands import acknowledge, deliverable
from skyframe.hub.db import insert
from skyframe.hub.schema import events, files, flight_files, flights, stations

MAX_EVENTS = 1000  #: events in one request at most
MAX_BODY = 1024 * 1024  #: bytes of one request's body at most
COMPLETE_SUFFIX = "-complete"
DOWN = ("offline", "refused")  #: sink health states counted as a sink being down


class _Lenient(BaseModel):
    # Newer stations may send more: unknown keys are ignored, known ones are checked.
    model_config = ConfigDict(extra="ignore")


class EventBody(_Lenient):
    """``LifecycleEvent.to_json()``, as the station's daemon emitted it."""

    kind: str = Field(min_length=1, max_length=100)
    pipeline: str = Field(min_length=1, max_length=200)
    relpath: str = Field(max_length=4096)
    time: float
    sink: str | None = Field(None, max_length=500)
    remote: str | None = Field(None, max_length=4096)
    size: int | None = Field(None, ge=0)
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    error: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=4000)
    meta: dict[str, Any] | None = None


class EventItem(_Lenient):
    """One event with its station-side identity."""

    id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, le=2**63 - 1)
    event: EventBody


class Ack(_Lenient):
    """The station's answer to a command."""

    id: str = Field(min_length=1, max_length=64)
    ok: bool
    detail: str | None = Field(None, max_length=2000)


class IngestBatch(_Lenient):
    """The whole request body."""

    station: str = Field(min_length=1, max_length=200)
    sent_at: float
    events: list[EventItem] = Field(default_factory=list, max_length=MAX_EVENTS)
    status: dict[str, Any] | None = None
    acks: list[Ack] = Field(default_factory=list, max_length=MAX_EVENTS)


class InvalidBatch(ValueError):
    """The body is not a valid batch; the message is one line."""


#: The most groups of one heartbeat taken (a station reports its latest 50).
MAX_REPORTED_GROUPS = 200
#: The longest group key or name taken from a heartbeat, and the largest count.
MAX_GROUP_KEY = 500
MAX_COUNT = 2**62


def parse_batch(body: dict[str, Any]) -> IngestBatch:
    """The batch, or InvalidBatch naming the first problem and where it is."""
    try:
        return IngestBatch.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]
        where = format_key(tuple(error["loc"])) or "the body"
        message = str(error["msg"]).removeprefix("Value error, ")
        more = exc.error_count() - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        raise InvalidBatch(f"{where}: {message}{extra}") from None


@dataclass(frozen=True)
class IngestResult:
    """What the hub answers a station."""

    accepted: int
    duplicates: int
    commands: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """The response body."""
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "commands": self.commands,
        }


def store_batch(
    connection: sa.Connection, station_id: int, batch: IngestBatch, now: float | None = None
) -> IngestResult:
    """Store one batch (call inside a transaction): events, files, flights, status, acks."""
    now = time.time() if now is None else now
    inserted = _insert_events(connection, station_id, batch.events, now)
    new = [item for item in batch.events if item.id in inserted]
    _record_files(connection, station_id, new)
    _record_flights(connection, station_id, new)
    _update_station(connection, station_id, batch, now)
    acknowledge(connection, station_id, [(a.id, a.ok, a.detail) for a in batch.acks], now)
    pending = deliverable(connection, station_id, now)
    return IngestResult(len(inserted), len(batch.events) - len(inserted), pending)


def _sha256(event: EventBody) -> str | None:
    if event.sha256:
        return event.sha256.lower()
    value = (event.meta or {}).get("sha256")
    if isinstance(value, str) and len(value) == 64:
        return value.lower()
    return None


def _insert_events(
    connection: sa.Connection, station_id: int, items: list[EventItem], now: float
) -> set[str]:
    if not items:
        return set()
    rows = [
        {
            "station_id": station_id,
            "event_id": item.id,
            "seq": item.seq,
            "time": item.event.time,
            "received_at": now,
            "kind": item.event.kind,
            "pipeline": item.event.pipeline,
            "relpath": item.event.relpath,
            "sink": item.event.sink,
            "remote": item.event.remote,
            "size": item.event.size,
            "sha256": _sha256(item.event),
            "error": item.event.error,
            "reason": item.event.reason,
            "meta": item.event.meta,
        }
        for item in items
    ]
    statement = _cached(
        connection,
        ("events",),
        lambda: (
            insert(connection, events)
            .on_conflict_do_nothing(index_elements=["station_id", "event_id"])
            .returning(events.c.event_id)
        ),
    )
    # One statement per batch of rows (SQLAlchemy's "insertmanyvalues"): only new rows return.
    return {row.event_id for row in connection.execute(statement, rows)}


def _name_lower(relpath: str) -> str:
    return relpath.rsplit("/", 1)[-1].lower()[:500]


def _record_files(connection: sa.Connection, station_id: int, items: Iterable[EventItem]) -> None:
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}
    gone: list[tuple[str, str, str]] = []
    for item in sorted(items, key=lambda i: (i.event.time, i.seq)):
        event = item.event
        if event.sink is None:
            continue
        key = (event.pipeline, event.sink, event.relpath)
        if event.kind == "delivered":
            latest[key] = {
                "station_id": station_id,
                "pipeline": event.pipeline,
                "sink": event.sink,
                "relpath": event.relpath,
                "name_lower": _name_lower(event.relpath),
                "remote": event.remote,
                "size": event.size,
                "sha256": _sha256(event),
                "delivered_at": event.time,
            }
        elif event.kind == "deleted":  # the remote copy was deleted with the local file
            latest.pop(key, None)
            gone.append(key)
    for pipeline, sink, relpath in gone:
        connection.execute(
            sa.delete(files).where(
                files.c.station_id == station_id,
                files.c.pipeline == pipeline,
                files.c.sink == sink,
                files.c.relpath == relpath,
            )
        )
    if not latest:
        return

    def build() -> Any:
        statement = insert(connection, files)
        excluded = statement.excluded
        return statement.on_conflict_do_update(
            index_elements=["station_id", "pipeline", "sink", "relpath"],
            set_={
                "remote": excluded.remote,
                "size": excluded.size,
                "sha256": excluded.sha256,
                "delivered_at": excluded.delivered_at,
            },
            where=files.c.delivered_at <= excluded.delivered_at,  # an old event arriving late
        )

    statement = _cached(connection, ("files",), build)
    connection.execute(statement, list(latest.values()))


def _group_of(event: EventBody) -> tuple[str, str] | None:
    """(group name, key) a delivered file belongs to, from ``meta.group`` when present."""
    group = (event.meta or {}).get("group")
    if isinstance(group, dict):
        name, key = group.get("name"), group.get("key")
        # A key longer than MAX_GROUP_KEY makes no flight: the index could not hold it.
        if (
            isinstance(name, str)
            and isinstance(key, str)
            and name
            and 0 < len(key) <= MAX_GROUP_KEY
        ):
            return name[:100], key
    return None


def _record_flights(connection: sa.Connection, station_id: int, items: Iterable[EventItem]) -> None:
    # A flight's upsert keeps the earliest and latest times it is given, whatever the order:
    # one upsert per flight of the batch does what one per event did, and the files go in one
    # statement (a batch is mostly the files of one flight).
    seen: dict[tuple[str, str, str], tuple[float, float]] = {}
    delivered: list[tuple[tuple[str, str, str], EventBody]] = []
    for item in items:
        event = item.event
        if event.kind.endswith(COMPLETE_SUFFIX) and len(event.kind) > len(COMPLETE_SUFFIX):
            meta = event.meta or {}
            counted = meta.get("files")
            size = meta.get("bytes", event.size)
            _upsert_flight(
                connection,
                station_id,
                event.pipeline,
                event.kind.removesuffix(COMPLETE_SUFFIX),
                event.relpath,
                event.time,
                complete={
                    "complete": True,
                    "completed_at": event.time,
                    "files": counted if isinstance(counted, int) else None,
                    "bytes": size if isinstance(size, int) else None,
                    "folder": event.remote,
                },
            )
        elif event.kind == "delivered" and (group := _group_of(event)) is not None:
            flight = (event.pipeline, *group)
            first, last = seen.get(flight, (event.time, event.time))
            seen[flight] = (min(first, event.time), max(last, event.time))
            delivered.append((flight, event))
    if not delivered:
        return
    flight_ids = {
        flight: _upsert_flight(connection, station_id, *flight, first, last_seen=last)
        for flight, (first, last) in seen.items()
    }
    rows = [
        {
            "flight_id": flight_ids[flight],
            "relpath": event.relpath[:1000],
            "size": event.size,
            "delivered_at": event.time,
        }
        for flight, event in delivered
    ]
    statement = _cached(
        connection,
        ("flight_files",),
        lambda: insert(connection, flight_files).on_conflict_do_nothing(
            index_elements=["flight_id", "relpath"]
        ),
    )
    connection.execute(statement, rows)


def _upsert_flight(  # noqa: PLR0917 (one flight's identity, in its column order)
    connection: sa.Connection,
    station_id: int,
    pipeline: str,
    name: str,
    key: str,
    at: float,
    complete: dict[str, Any] | None = None,
    last_seen: float | None = None,
) -> int:
    """The flight's id, made if new; its first and last seen widened to ``at`` (through
    ``last_seen`` when given)."""
    row = {
        "station_id": station_id,
        "pipeline": pipeline,
        "name": name,
        "key": key,
        "first_seen": at,
        "last_seen": at if last_seen is None else last_seen,
        **(complete or {}),
    }
    statement = _flight_upsert(connection, tuple(complete or ()))
    flight_id: int = connection.execute(statement, row).scalar_one()
    return flight_id


def _flight_upsert(connection: sa.Connection, complete: tuple[str, ...]) -> Any:
    def build() -> Any:
        statement = insert(connection, flights)
        excluded = statement.excluded
        changes: dict[str, Any] = {
            "first_seen": sa.case(
                (excluded.first_seen < flights.c.first_seen, excluded.first_seen),
                else_=flights.c.first_seen,
            ),
            "last_seen": sa.case(
                (excluded.last_seen > flights.c.last_seen, excluded.last_seen),
                else_=flights.c.last_seen,
            ),
        }
        changes.update({column: getattr(excluded, column) for column in complete})
        return statement.on_conflict_do_update(
            index_elements=["station_id", "pipeline", "name", "key"], set_=changes
        ).returning(flights.c.id)

    return _cached(connection, ("flight", *complete), build)


_STATEMENTS: dict[tuple[str, ...], Any] = {}


def _cached(connection: sa.Connection, name: tuple[str, ...], build: Callable[[], Any]) -> Any:
    """A statement built once per backend: building an upsert (its ``excluded`` columns)
    costs more than running it. The values come with each execution."""
    key = (connection.dialect.name, *name)
    statement = _STATEMENTS.get(key)
    if statement is None:
        statement = _STATEMENTS[key] = build()
    return statement


def _update_station(
    connection: sa.Connection, station_id: int, batch: IngestBatch, now: float
) -> None:
    values: dict[str, Any] = {"last_seen": now, "last_sent_at": batch.sent_at}
    if batch.events:
        values["last_seq"] = max(item.seq for item in batch.events)
    if batch.status is not None:
        before = connection.execute(
            sa.select(stations.c.sinks_down).where(stations.c.id == station_id)
        ).scalar_one_or_none()
        values["last_status"] = batch.status
        values["status_at"] = now
        values["sinks_down"] = sinks_down(batch.status, before or {}, now)
        values["dead_letters"] = dead_letters(batch.status)
        _record_reported_groups(connection, station_id, batch.status, now)
    connection.execute(sa.update(stations).where(stations.c.id == station_id).values(**values))


def _record_reported_groups(
    connection: sa.Connection, station_id: int, status: dict[str, Any], now: float
) -> None:
    """The groups (flights) of the station's heartbeat: their progress as the station counts
    it (files arrived of files seen), whether or not their files' events carry the group."""
    groups = status.get("groups")
    if not isinstance(groups, list):
        return
    for group in groups[:MAX_REPORTED_GROUPS]:
        if not isinstance(group, dict):
            continue
        pipeline, name, key = group.get("pipeline"), group.get("name"), group.get("key")
        files, seen = group.get("files"), group.get("seen")
        texts = (pipeline, name, key)
        if not all(isinstance(v, str) and 0 < len(v) <= MAX_GROUP_KEY for v in texts):
            continue  # what the index cannot hold would fail the whole batch, again and again
        counts = (files, seen)
        if not all(type(v) is int and 0 <= v < MAX_COUNT for v in counts):
            continue
        at = group.get("last_arrival")
        flight_id = _upsert_flight(
            connection,
            station_id,
            str(pipeline)[:200],
            str(name)[:100],
            str(key),
            float(at) if isinstance(at, int | float) else now,
        )
        connection.execute(
            sa.update(flights)
            .where(flights.c.id == flight_id)
            .values(reported_files=files, reported_seen=seen)
        )


def _pipelines(status: dict[str, Any]) -> list[dict[str, Any]]:
    pipelines = status.get("pipelines")
    if not isinstance(pipelines, list):
        return []
    return [p for p in pipelines if isinstance(p, dict)]


def sinks_down(status: dict[str, Any], before: dict[str, float], now: float) -> dict[str, float]:
    """``{"pipeline/sink": since}`` of the sinks a status shows offline or refused; a sink
    already down keeps the time it went down."""
    down: dict[str, float] = {}
    for pipeline in _pipelines(status):
        for sink in pipeline.get("sinks") or []:
            if isinstance(sink, dict) and sink.get("health") in DOWN:
                key = f"{pipeline.get('name')}/{sink.get('key')}"
                since = before.get(key)
                down[key] = since if isinstance(since, int | float) else now
    return down


def dead_letters(status: dict[str, Any]) -> int:
    """Dead-lettered jobs of every pipeline a status shows."""
    total = 0
    for pipeline in _pipelines(status):
        queue = pipeline.get("queue")
        if isinstance(queue, dict) and isinstance(queue.get("dead"), int):
            total += queue["dead"]
    return total
