"""Station tokens: made once, shown once, kept only as a hash.

A token is 32 random bytes (URL-safe base64); the hub keeps their sha256. Looking a token up
compares hashes (in constant time once the row is found), so the stored value is worthless to
someone who reads the database.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skyframe.errors import SkyframeError
from skyframe.hub.schema import stations

STATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
TOKEN_BYTES = 32


class StationError(SkyframeError):
    """A station name that is invalid, taken or unknown."""


@dataclass(frozen=True)
class StationToken:
    """One station as ``token list`` shows it (never its token)."""

    name: str
    created_at: float
    last_seen: float | None
    revoked_at: float | None


def token_hash(token: str) -> str:
    """The stored form of a token: sha256, hex."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_name(name: str) -> str:
    """The name, or StationError saying what a station name may hold."""
    if not STATION_NAME.fullmatch(name):
        raise StationError(
            f"invalid station name {name!r}: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 100 characters"
        )
    return name


def add_station(engine: Engine, name: str) -> str:
    """Create the station (or give a revoked one a new token); the token, to show once."""
    check_name(name)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = time.time()
    with engine.begin() as connection:
        row = connection.execute(
            sa.select(stations.c.id, stations.c.token_hash).where(stations.c.name == name)
        ).first()
        if row is not None and row.token_hash is not None:
            raise StationError(
                f"station {name!r} already has a token: revoke it first "
                f"(skyframe hub token revoke {name})"
            )
        if row is None:
            connection.execute(
                sa.insert(stations).values(name=name, token_hash=token_hash(token), created_at=now)
            )
        else:
            connection.execute(
                sa.update(stations)
                .where(stations.c.id == row.id)
                .values(token_hash=token_hash(token), created_at=now, revoked_at=None)
            )
    return token


def revoke_station(engine: Engine, name: str) -> None:
    """Forget the station's token: its next ingest is refused (401); its history stays."""
    with engine.begin() as connection:
        result = connection.execute(
            sa.update(stations)
            .where(stations.c.name == name, stations.c.token_hash.is_not(None))
            .values(token_hash=None, revoked_at=time.time())
        )
        if result.rowcount == 0:
            known = connection.execute(
                sa.select(stations.c.id).where(stations.c.name == name)
            ).first()
            raise StationError(
                f"station {name!r} has no token to revoke"
                if known
                else f"no station named {name!r}"
            )


def list_stations(engine: Engine) -> list[StationToken]:
    """Every station, by name."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(
                stations.c.name, stations.c.created_at, stations.c.last_seen, stations.c.revoked_at
            ).order_by(stations.c.name)
        ).all()
    return [StationToken(r.name, r.created_at, r.last_seen, r.revoked_at) for r in rows]


def station_of_token(connection: sa.Connection, token: str) -> tuple[int, str] | None:
    """(id, name) of the station whose token this is; None for an unknown or revoked one."""
    wanted = token_hash(token)
    row = connection.execute(
        sa.select(stations.c.id, stations.c.name, stations.c.token_hash).where(
            stations.c.token_hash == wanted
        )
    ).first()
    if row is None or not hmac.compare_digest(row.token_hash, wanted):
        return None
    return row.id, row.name
