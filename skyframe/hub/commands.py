"""Commands to stations (pause, resume): created by an operator, handed to the station in the
reply to each ingest until it acknowledges them.

States: ``pending`` (not handed out yet), ``sent`` (handed out, no answer yet), ``confirmed``
(the station answered; ``ok`` says whether it did it, ``detail`` how).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Iterable
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skyframe.hub.schema import commands, stations

Action = Literal["pause", "resume"]
ACTIONS: tuple[Action, ...] = ("pause", "resume")


class UnknownStation(LookupError):
    """No station of that name."""


def create_command(
    engine: Engine, station: str, action: Action, pipeline: str | None = None
) -> dict[str, Any]:
    """A new pending command for a station (UnknownStation when there is none)."""
    with engine.begin() as connection:
        station_id = connection.execute(
            sa.select(stations.c.id).where(stations.c.name == station)
        ).scalar_one_or_none()
        if station_id is None:
            raise UnknownStation(station)
        row = {
            "id": uuid.uuid4().hex,
            "station_id": station_id,
            "action": action,
            "pipeline": pipeline,
            "created_at": time.time(),
        }
        connection.execute(sa.insert(commands).values(**row))
    return {"id": row["id"], "station": station, "action": action, "pipeline": pipeline,
            "state": "pending", "created_at": row["created_at"]}  # fmt: skip


def acknowledge(
    connection: sa.Connection,
    station_id: int,
    acks: Iterable[tuple[str, bool, str | None]],
    now: float,
) -> int:
    """Mark the station's own commands confirmed; how many were waiting for it."""
    confirmed = 0
    for command_id, ok, detail in acks:
        result = connection.execute(
            sa.update(commands)
            .where(
                commands.c.id == command_id,
                commands.c.station_id == station_id,
                commands.c.confirmed_at.is_(None),
            )
            .values(confirmed_at=now, ok=ok, detail=detail)
        )
        confirmed += result.rowcount
    return confirmed


def deliverable(
    connection: sa.Connection, station_ids: Collection[int], now: float
) -> dict[int, list[dict[str, Any]]]:
    """Each station's unconfirmed commands, oldest first, marked sent (one query for all)."""
    if not station_ids:
        return {}
    rows = connection.execute(
        sa.select(commands.c.id, commands.c.station_id, commands.c.action, commands.c.pipeline)
        .where(commands.c.station_id.in_(sorted(station_ids)), commands.c.confirmed_at.is_(None))
        .order_by(commands.c.created_at, commands.c.id)
    ).all()
    if rows:
        connection.execute(
            sa.update(commands)
            .where(commands.c.id.in_([r.id for r in rows]), commands.c.sent_at.is_(None))
            .values(sent_at=now)
        )
    found: dict[int, list[dict[str, Any]]] = {station_id: [] for station_id in station_ids}
    for r in rows:
        found[r.station_id].append({"id": r.id, "action": r.action, "pipeline": r.pipeline})
    return found


def state_of(sent_at: float | None, confirmed_at: float | None) -> str:
    """pending, sent or confirmed."""
    if confirmed_at is not None:
        return "confirmed"
    return "sent" if sent_at is not None else "pending"


def list_commands(engine: Engine, station: str | None, limit: int) -> list[dict[str, Any]]:
    """The latest commands, newest first, of one station or all."""
    query = (
        sa.select(commands, stations.c.name.label("station"))
        .join(stations, stations.c.id == commands.c.station_id)
        .order_by(commands.c.created_at.desc())
        .limit(limit)
    )
    if station is not None:
        query = query.where(stations.c.name == station)
    with engine.connect() as connection:
        rows = connection.execute(query).all()
    return [
        {
            "id": r.id,
            "station": r.station,
            "action": r.action,
            "pipeline": r.pipeline,
            "state": state_of(r.sent_at, r.confirmed_at),
            "created_at": r.created_at,
            "sent_at": r.sent_at,
            "confirmed_at": r.confirmed_at,
            "ok": r.ok,
            "detail": r.detail,
        }
        for r in rows
    ]
