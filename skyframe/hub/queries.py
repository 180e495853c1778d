"""What the hub's API and page read: stations, where a file is, flights, events, alerts."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skyframe.hub.ingest import as_dict, as_list
from skyframe.hub.schema import alerts, events, files, flight_files, flights, stations

DAY = 86400.0
#: the columns of an event shown as its ``event`` (the shape the station sent)
EVENT_FIELDS = (
    "kind", "pipeline", "relpath", "sink", "remote", "size", "sha256", "error", "reason", "meta",
    "time",
)  # fmt: skip
ERRORS_SHOWN = 5  #: latest errors of a station shown in its overview


def stations_overview(
    engine: Engine, silent_after: float, now: float | None = None
) -> list[dict[str, Any]]:
    """Every station with its state, from its last ingest and its last status."""
    now = time.time() if now is None else now
    with engine.connect() as connection:
        rows = connection.execute(sa.select(stations).order_by(stations.c.name)).all()
    return [_station(row, silent_after, now) for row in rows]


def _station(row: sa.Row[Any], silent_after: float, now: float) -> dict[str, Any]:
    status = row.last_status if isinstance(row.last_status, dict) else {}
    pipelines = []
    queue = {"pending": 0, "leased": 0, "waiting": 0, "dead": 0}
    for pipeline in as_list(status.get("pipelines")):
        if not isinstance(pipeline, dict):
            continue
        counts = pipeline.get("queue")
        counts = counts if isinstance(counts, dict) else {}
        for state in queue:
            value = counts.get(state)
            queue[state] += value if isinstance(value, int) else 0
        pipelines.append(
            {
                "name": pipeline.get("name"),
                "paused": bool(pipeline.get("paused")),
                "queue": counts,
                "sinks": [
                    {k: sink.get(k) for k in ("key", "display", "health", "last_error", "failed")}
                    for sink in as_list(pipeline.get("sinks"))
                    if isinstance(sink, dict)
                ],
            }
        )
    down = row.sinks_down if isinstance(row.sinks_down, dict) else {}
    online = row.last_seen is not None and now - row.last_seen < silent_after
    return {
        "name": row.name,
        "created_at": row.created_at,
        "revoked": row.token_hash is None,
        "last_seen": row.last_seen,
        "online": online,
        "state": "online" if online else "never seen" if row.last_seen is None else "silent",
        "paused": bool(status.get("paused")),
        "version": status.get("version"),
        "pipelines": pipelines,
        "queue": queue,
        "dead_letters": row.dead_letters,
        "outbox": status.get("outbox"),  # events waiting on the station (its hub link)
        "sinks_offline": [{"sink": key, "since": since} for key, since in sorted(down.items())],
        "throughput": as_dict(status.get("throughput")) or {"bytes_per_s": 0.0, "files_per_s": 0.0},
        "totals": as_dict(status.get("totals")),
        "errors": as_list(status.get("errors"))[:ERRORS_SHOWN],
    }


def _like(glob: str) -> str:
    """A glob (``*``, ``?``) as a LIKE pattern with ``\\`` as its escape."""
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def find_files(
    engine: Engine, *, name: str | None = None, sha256: str | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    """Where a file is: by its name (exact or a glob with ``*`` and ``?``, case-insensitive;
    with a ``/`` the path under the source is matched) or by its sha256."""
    query = sa.select(files, stations.c.name.label("station")).join(
        stations, stations.c.id == files.c.station_id
    )
    if sha256 is not None:
        query = query.where(files.c.sha256 == sha256.lower())
    elif name is not None:
        folded = name.lower()
        column = sa.func.lower(files.c.relpath) if "/" in name else files.c.name_lower
        if "*" in name or "?" in name:
            query = query.where(column.like(_like(folded), escape="\\"))
        else:
            query = query.where(column == folded)
    # Newest first; copies delivered at the same moment by station, pipeline, sink, path.
    query = query.order_by(
        files.c.delivered_at.desc(),
        stations.c.name,
        files.c.pipeline,
        files.c.sink,
        files.c.relpath,
    ).limit(limit)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        {
            "station": r.station,
            "pipeline": r.pipeline,
            "relpath": r.relpath,
            "name": r.relpath.rsplit("/", 1)[-1],
            "sink": r.sink,
            "remote": r.remote,
            "delivered_at": r.delivered_at,
            "size": r.size,
            "sha256": r.sha256,
        }
        for r in rows
    ]


def day_bounds(day: date) -> tuple[float, float]:
    """Start and end of a UTC day, in epoch seconds."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()
    return start, start + DAY


def flights_of_day(engine: Engine, day: date, limit: int = 500) -> list[dict[str, Any]]:
    """Flights (groups) with activity on a UTC day, latest first, with their progress."""
    start, end = day_bounds(day)
    of_day = sa.and_(flights.c.first_seen < end, flights.c.last_seen >= start)
    delivered = (
        sa.select(
            flight_files.c.flight_id,
            sa.func.count().label("delivered"),
            sa.func.coalesce(sa.func.sum(flight_files.c.size), 0).label("delivered_bytes"),
        )
        .where(flight_files.c.flight_id.in_(sa.select(flights.c.id).where(of_day)))
        .group_by(flight_files.c.flight_id)
        .subquery()
    )
    query = (
        sa.select(
            flights,
            stations.c.name.label("station"),
            sa.func.coalesce(delivered.c.delivered, 0).label("delivered"),
            sa.func.coalesce(delivered.c.delivered_bytes, 0).label("delivered_bytes"),
        )
        .join(stations, stations.c.id == flights.c.station_id)
        .outerjoin(delivered, delivered.c.flight_id == flights.c.id)
        .where(of_day)
        .order_by(flights.c.last_seen.desc())
        .limit(limit)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    out = []
    for r in rows:
        arrived = max(int(r.delivered), int(r.reported_files or 0))
        seen = max(int(r.files or 0), int(r.reported_seen or 0), arrived)
        out.append(
            {
                "station": r.station,
                "pipeline": r.pipeline,
                "group": r.name,
                "name": r.key,
                "folder": r.folder,
                "files_delivered": arrived,
                "files_seen": seen,
                "bytes": int(r.bytes) if r.bytes is not None else int(r.delivered_bytes),
                "complete": bool(r.complete),
                "first_seen": r.first_seen,
                "last_seen": r.last_seen,
                "completed_at": r.completed_at,
            }
        )
    return out


def list_events(
    engine: Engine,
    *,
    station: str | None = None,
    since: float | None = None,
    after: int = 0,
    limit: int = 200,
) -> tuple[list[dict[str, Any]], int | None]:
    """Events in the order received, after the cursor ``after``; the cursor of the next page
    (None when this page is the last)."""
    query = (
        sa.select(events, stations.c.name.label("station"))
        .join(stations, stations.c.id == events.c.station_id)
        .where(events.c.id > after)
        .order_by(events.c.id)
        .limit(limit + 1)
    )
    if station is not None:
        query = query.where(stations.c.name == station)
    if since is not None:
        query = query.where(events.c.time >= since)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    page = rows[:limit]
    shown = [
        {
            "cursor": r.id,
            "station": r.station,
            "id": r.event_id,
            "seq": r.seq,
            "received_at": r.received_at,
            "event": {key: value for key in EVENT_FIELDS if (value := getattr(r, key)) is not None},
        }
        for r in page
    ]
    return shown, (page[-1].id if len(rows) > limit else None)


def list_alerts(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    """Open alerts first, then the latest cleared ones."""
    query = (
        sa.select(alerts)
        .order_by(alerts.c.cleared_at.is_not(None), alerts.c.fired_at.desc())
        .limit(limit)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        {
            "kind": r.kind,
            "station": r.station,
            "subject": r.subject,
            "message": r.message,
            "fired_at": r.fired_at,
            "cleared_at": r.cleared_at,
            "open": r.cleared_at is None,
        }
        for r in rows
    ]
