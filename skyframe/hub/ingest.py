"""``POST /api/v1/ingest``: what a station sends (checked), and storing it, with the
batches that arrived with it, in one transaction.

Idempotent: an event whose id the station sent before is counted as a duplicate and changes
nothing (``INSERT ... ON CONFLICT DO NOTHING``); only the events that are new update the
files, the flights and the station. The contract is in docs/hub.md.
"""

from __future__ import annotations

import hmac
import json
import re
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import sqlalchemy as sa
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from skyframe.config import format_key
from skyframe.hub.commands import acknowledge, deliverable
from skyframe.hub.db import insert
from skyframe.hub.schema import events, files, flight_files, flights, stations

MAX_EVENTS = 1000  #: events in one request at most
MAX_BODY = 1024 * 1024  #: bytes of one request's body at most
COMPLETE_SUFFIX = "-complete"
DOWN = ("offline", "refused")  #: sink health states counted as a sink being down


#: A sha256 digest as hex, as the ingest and the file search take it.
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
#: The largest integer a database column holds (a signed 64-bit integer).
MAX_INT = 2**63 - 1


def _text_safe(value: dict[str, Any]) -> dict[str, Any]:
    """A free-form JSON value (``meta``, ``status``) with every text a database takes: a lone
    surrogate (JSON can carry one, UTF-8 cannot) is written as its escape, ``\\udce9``.
    Checked in one pass of the JSON encoder; only a value that holds one is rebuilt."""
    try:
        try:
            _UNESCAPED.encode(value).encode("utf-8")
        except UnicodeEncodeError:
            escaped: dict[str, Any] = _escaped(value)
            return escaped
    except RecursionError:
        raise ValueError("nested too deep") from None
    return value


_UNESCAPED = json.JSONEncoder(ensure_ascii=False, check_circular=False)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(k): _escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(item) for item in value]
    return value


def _column_int(value: Any) -> int | None:
    """``value`` if it is a whole number an integer column holds (not a bool), else None."""
    return value if type(value) is int and 0 <= value <= MAX_INT else None


#: ``meta`` and ``status``: free-form; stored as sent, but for texts no database takes.
FreeForm = Annotated[dict[str, Any], AfterValidator(_text_safe)]
#: A time in seconds since the epoch: a finite number.
Seconds = Annotated[float, Field(allow_inf_nan=False)]


class _Lenient(BaseModel):
    # Newer stations may send more: unknown keys are ignored, known ones are checked.
    model_config = ConfigDict(extra="ignore")


class EventBody(_Lenient):
    """``LifecycleEvent.to_json()``, as the station's daemon emitted it."""

    kind: str = Field(min_length=1, max_length=100)
    pipeline: str = Field(min_length=1, max_length=200)
    relpath: str = Field(max_length=4096)
    time: Seconds
    sink: str | None = Field(None, max_length=500)
    remote: str | None = Field(None, max_length=4096)
    size: int | None = Field(None, ge=0, le=MAX_INT)
    sha256: str | None = Field(None, pattern=f"^{SHA256_HEX.pattern}$")
    error: str | None = Field(None, max_length=200)
    reason: str | None = Field(None, max_length=4000)
    meta: FreeForm | None = None


class EventItem(_Lenient):
    """One event with its station-side identity."""

    id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, le=MAX_INT)
    event: EventBody


class Ack(_Lenient):
    """The station's answer to a command."""

    id: str = Field(min_length=1, max_length=64)
    ok: bool
    detail: str | None = Field(None, max_length=2000)


class IngestBatch(_Lenient):
    """The whole request body."""

    station: str = Field(min_length=1, max_length=200)
    sent_at: Seconds
    events: list[EventItem] = Field(default_factory=list, max_length=MAX_EVENTS)
    status: FreeForm | None = None
    acks: list[Ack] = Field(default_factory=list, max_length=MAX_EVENTS)


class InvalidBatch(ValueError):
    """The body is not a valid batch; the message is one line, and ``where`` the path of the
    first problem in the body (``["events", 0, "event", "pipeline"]``)."""

    def __init__(self, message: str, where: list[str | int] | None = None) -> None:
        super().__init__(message)
        self.where = where or []


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
        path = [part for part in error["loc"] if isinstance(part, str | int)]
        raise InvalidBatch(f"{where}: {message}{extra}", path) from None


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


@dataclass(frozen=True)
class Arrival:
    """One station's batch waiting to be stored, with the hash of the token it came with
    (checked again in the transaction that stores it)."""

    station_id: int
    token_hash: str
    batch: IngestBatch


def store_batches(
    connection: sa.Connection, arrivals: Sequence[Arrival], now: float | None = None
) -> list[IngestResult | None]:
    """Store batches of any stations in one transaction (call inside it): a statement per
    table for them all, not per batch. One result per arrival, in order; None for a batch
    whose token was revoked meanwhile (nothing of it is stored)."""
    now = time.time() if now is None else now
    current = _token_hashes(connection, {a.station_id for a in arrivals})
    kept = [
        a for a in arrivals if hmac.compare_digest(current.get(a.station_id) or "", a.token_hash)
    ]
    # An event that two batches of the group both carry (a station resending before its
    # first answer came), or one batch twice, is stored once, for the first that carries it,
    # and counted a duplicate wherever else it is.
    first: dict[tuple[int, str], tuple[int, EventItem]] = {}
    for index, arrival in enumerate(kept):
        for item in arrival.batch.events:
            first.setdefault((arrival.station_id, item.id), (index, item))
    inserted = _insert_events(
        connection, [(station_id, item) for (station_id, _), (_, item) in first.items()], now
    )
    new: list[list[EventItem]] = [[] for _ in kept]
    for key, (index, item) in first.items():
        if key in inserted:
            new[index].append(item)
    fresh = [(a.station_id, item) for a, items in zip(kept, new, strict=True) for item in items]
    _record_files(connection, fresh)
    _record_flights(connection, fresh)
    _update_stations(connection, kept, now)
    for arrival in kept:
        if arrival.batch.acks:
            acks = [(a.id, a.ok, a.detail) for a in arrival.batch.acks]
            acknowledge(connection, arrival.station_id, acks, now)
    pending = deliverable(connection, {a.station_id for a in kept}, now)
    stored = {
        id(arrival): IngestResult(
            len(items), len(arrival.batch.events) - len(items), pending[arrival.station_id]
        )
        for arrival, items in zip(kept, new, strict=True)
    }
    return [stored.get(id(arrival)) for arrival in arrivals]


def _token_hashes(connection: sa.Connection, station_ids: Collection[int]) -> dict[int, str]:
    """The current token hash of each station that has one (a revoked token has none)."""
    rows = connection.execute(
        sa.select(stations.c.id, stations.c.token_hash).where(
            stations.c.id.in_(sorted(station_ids)), stations.c.token_hash.is_not(None)
        )
    ).all()
    return {row.id: row.token_hash for row in rows}


def _sha256(event: EventBody) -> str | None:
    if event.sha256:
        return event.sha256.lower()
    value = (event.meta or {}).get("sha256")
    if isinstance(value, str) and SHA256_HEX.fullmatch(value):
        return value.lower()
    return None


def _insert_events(
    connection: sa.Connection, items: list[tuple[int, EventItem]], now: float
) -> set[tuple[int, str]]:
    """Insert the events; (station id, event id) of those that were new."""
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
        for station_id, item in items
    ]
    statement = _cached(
        connection,
        ("events",),
        lambda: (
            insert(connection, events)
            .on_conflict_do_nothing(index_elements=["station_id", "event_id"])
            .returning(events.c.station_id, events.c.event_id)
        ),
    )
    # One statement per page of rows (SQLAlchemy's "insertmanyvalues"): only new rows return.
    return {(row.station_id, row.event_id) for row in connection.execute(statement, rows)}


def _name_lower(relpath: str) -> str:
    return relpath.rsplit("/", 1)[-1].lower()[:500]


def _record_files(connection: sa.Connection, items: Iterable[tuple[int, EventItem]]) -> None:
    latest: dict[tuple[int, str, str, str], dict[str, Any]] = {}
    gone: list[tuple[int, str, str, str]] = []
    for station_id, item in sorted(items, key=lambda i: (i[1].event.time, i[1].seq)):
        event = item.event
        if event.sink is None:
            continue
        key = (station_id, event.pipeline, event.sink, event.relpath)
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
    for station_id, pipeline, sink, relpath in gone:
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
    # In the order of the unique index, as every hub's transactions take its rows' locks.
    connection.execute(statement, [latest[key] for key in sorted(latest)])


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


def _record_flights(connection: sa.Connection, items: Iterable[tuple[int, EventItem]]) -> None:
    # A flight's upsert keeps the earliest and latest times it is given, whatever the order:
    # one row per flight of the group does what one per event did; the flights go in one
    # statement and their files in another (a batch is mostly the files of one flight).
    seen: dict[tuple[int, str, str, str], tuple[float, float]] = {}
    delivered: list[tuple[tuple[int, str, str, str], EventBody]] = []
    for station_id, item in items:
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
                    "files": _column_int(counted),
                    "bytes": _column_int(size),
                    "folder": event.remote,
                },
            )
        elif event.kind == "delivered" and (group := _group_of(event)) is not None:
            flight = (station_id, event.pipeline, *group)
            first, last = seen.get(flight, (event.time, event.time))
            seen[flight] = (min(first, event.time), max(last, event.time))
            delivered.append((flight, event))
    if not delivered:
        return
    flight_ids = _upsert_flights(connection, seen)
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


def _upsert_flights(
    connection: sa.Connection, seen: dict[tuple[int, str, str, str], tuple[float, float]]
) -> dict[tuple[int, str, str, str], int]:
    """Each flight's id, made if new, its first and last seen widened (one statement)."""
    rows = [
        {
            "station_id": station_id,
            "pipeline": pipeline,
            "name": name,
            "key": key,
            "first_seen": first,
            "last_seen": last,
        }
        for (station_id, pipeline, name, key), (first, last) in sorted(seen.items())
    ]
    statement = _flight_upsert(connection, ())
    found = connection.execute(statement, rows)
    ids = {(r.station_id, r.pipeline, r.name, r.key): r.id for r in found}
    missing = seen.keys() - ids.keys()
    if missing:  # what the database gave back is not what was sent (it should never be)
        raise LookupError(f"flights not found after their upsert: {sorted(missing)[:3]}")
    return ids


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
    flight_id: int = connection.execute(statement, row).one().id
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
        ).returning(
            flights.c.id, flights.c.station_id, flights.c.pipeline, flights.c.name, flights.c.key
        )

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


def _update_stations(connection: sa.Connection, arrivals: Sequence[Arrival], now: float) -> None:
    """Each station's last seen, last sequence number and (when it sent one) its status, with
    the flights its status reports: a statement for all the stations of each kind."""
    merged: dict[int, dict[str, Any]] = {}
    for arrival in arrivals:  # a station twice in the group: its latest batch wins
        batch = arrival.batch
        values = merged.setdefault(
            arrival.station_id,
            {"b_id": arrival.station_id, "b_now": now, "b_seq": None, "b_status": None},
        )
        values["b_sent_at"] = max(values.get("b_sent_at", batch.sent_at), batch.sent_at)
        if batch.events:
            top = max(item.seq for item in batch.events)
            values["b_seq"] = top if values["b_seq"] is None else max(values["b_seq"], top)
        if batch.status is not None:
            values["b_status"] = batch.status
    # In id order, as every hub's transactions take the stations' row locks.
    rows = [merged[station_id] for station_id in sorted(merged)]
    plain = [row for row in rows if row["b_status"] is None]
    reporting = [row for row in rows if row["b_status"] is not None]
    if plain:
        connection.execute(_station_update(connection, status=False), plain)
    if not reporting:
        return
    before = dict(
        connection.execute(
            sa.select(stations.c.id, stations.c.sinks_down).where(
                stations.c.id.in_([row["b_id"] for row in reporting])
            )
        ).all()
    )
    reported: dict[tuple[int, str, str, str], dict[str, Any]] = {}
    for row in reporting:
        status = row["b_status"]
        row["b_down"] = sinks_down(status, before.get(row["b_id"]) or {}, now)
        row["b_dead"] = dead_letters(status)
        reported.update(_reported_groups(row["b_id"], status, now))
    connection.execute(_station_update(connection, status=True), reporting)
    if reported:
        statement = _flight_upsert(connection, ("reported_files", "reported_seen"))
        connection.execute(statement, [reported[key] for key in sorted(reported)]).all()


def _station_update(connection: sa.Connection, *, status: bool) -> Any:
    def build() -> Any:
        values: dict[str, Any] = {
            "last_seen": sa.bindparam("b_now"),
            "last_sent_at": sa.bindparam("b_sent_at"),
            "last_seq": sa.func.coalesce(
                sa.bindparam("b_seq", type_=sa.BigInteger), stations.c.last_seq
            ),
        }
        if status:
            values.update(
                last_status=sa.bindparam("b_status", type_=stations.c.last_status.type),
                status_at=sa.bindparam("b_now"),
                sinks_down=sa.bindparam("b_down", type_=stations.c.sinks_down.type),
                dead_letters=sa.bindparam("b_dead"),
            )
        return sa.update(stations).where(stations.c.id == sa.bindparam("b_id")).values(**values)

    return _cached(connection, ("stations", "status" if status else "plain"), build)


def _reported_groups(
    station_id: int, status: dict[str, Any], now: float
) -> dict[tuple[int, str, str, str], dict[str, Any]]:
    """The groups (flights) of the station's heartbeat, as flight rows with their progress as
    the station counts it (files arrived of files seen), whether or not their files' events
    carry the group."""
    groups = status.get("groups")
    if not isinstance(groups, list):
        return {}
    found: dict[tuple[int, str, str, str], dict[str, Any]] = {}
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
        at = float(at) if isinstance(at, int | float) and abs(at) < MAX_COUNT else now
        identity = (station_id, str(pipeline)[:200], str(name)[:100], str(key))
        found[identity] = {  # the same group twice in one status: the later one counts
            "station_id": station_id,
            "pipeline": identity[1],
            "name": identity[2],
            "key": identity[3],
            "first_seen": at,
            "last_seen": at,
            "reported_files": files,
            "reported_seen": seen,
        }
    return found


# A status is stored as the station sent it: its parts are taken only in the shape they have.
def as_list(value: Any) -> list[Any]:
    """``value`` if it is a list, else an empty one."""
    return value if isinstance(value, list) else []


def as_dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping, else an empty one."""
    return value if isinstance(value, dict) else {}


def _pipelines(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in as_list(status.get("pipelines")) if isinstance(p, dict)]


def sinks_down(status: dict[str, Any], before: dict[str, float], now: float) -> dict[str, float]:
    """``{"pipeline/sink": since}`` of the sinks a status shows offline or refused; a sink
    already down keeps the time it went down."""
    down: dict[str, float] = {}
    for pipeline in _pipelines(status):
        for sink in as_list(pipeline.get("sinks")):
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
        dead = queue.get("dead") if isinstance(queue, dict) else None
        if type(dead) is int and 0 <= dead < MAX_COUNT:
            total += dead
    return min(total, MAX_INT)  # a few pipelines of MAX_COUNT would overflow the column
