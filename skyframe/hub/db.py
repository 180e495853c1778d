"""The hub's database: an engine for SQLite (WAL) or PostgreSQL (psycopg 3), migrated on open.

Migrations are Alembic's, shipped in ``skyframe/hub/migrations``. :func:`open_database` runs
them to the newest revision every time, which does nothing when they have run: on PostgreSQL
under an advisory lock, so that several hubs starting at once migrate one after the other;
on SQLite inside one ``BEGIN IMMEDIATE`` transaction, which serialises them the same way.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from skyframe.config import redact_urls
from skyframe.errors import ConfigError, SkyframeError

log = logging.getLogger(__name__)

MIGRATIONS = "skyframe.hub:migrations"
#: pg_advisory_xact_lock key of the migrations: "skyf" "hub1" as two 32-bit halves
MIGRATION_LOCK = 0x736B7966_68756231
SQLITE_BUSY_TIMEOUT = 30.0  #: seconds a SQLite writer waits for another one
#: Threads that talk to the database, and PostgreSQL connections kept: a request mostly
#: waits for the database's answers, so several overlap on one core.
DATABASE_THREADS = 16


class DatabaseError(SkyframeError):
    """The hub's database cannot be reached or used."""


def create_db_engine(url: str) -> Engine:
    """An engine for ``url``: ``sqlite:///PATH`` or ``postgresql://...`` (through psycopg 3)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"database: not a database URL: {redact_urls(url)!r}") from None
    backend = parsed.get_backend_name()
    if backend == "postgresql":
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        try:
            # No ping before each use (a round trip per request): a connection that broke
            # (PostgreSQL restarted) fails one request, which the station sends again, and
            # SQLAlchemy then drops every connection of the pool.
            return sa.create_engine(parsed, pool_size=DATABASE_THREADS, max_overflow=4)
        except (NoSuchModuleError, ModuleNotFoundError):
            raise ConfigError(
                "database: PostgreSQL needs psycopg 3: pip install 'skyframe[postgres]'"
            ) from None
    if backend != "sqlite":
        raise ConfigError(
            f"database: {backend} is not supported: use sqlite:///PATH or postgresql://..."
        )
    engine = sa.create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT})
    _sqlite_transactions(engine)
    return engine


def _sqlite_transactions(engine: Engine) -> None:
    """SQLite: WAL, foreign keys, and transactions that take the write lock when they begin
    (so that two writers wait for each other instead of failing halfway)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 begins nothing on its own
        cursor = dbapi_connection.cursor()
        _journal_to_wal(cursor)
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _journal_to_wal(cursor: Any) -> None:
    """Put the database in WAL mode. On a new file another hub may hold the write lock (its
    migrations) while the mode is still the default: SQLite then says "database is locked"
    at once, without its busy handler, so the switch is tried again for as long as a writer
    is waited for."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.05)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (idempotent; safe with several hubs at once)."""
    config = AlembicConfig()
    config.set_main_option("script_location", MIGRATIONS)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def open_database(url: str) -> Engine:
    """An engine on a migrated database; DatabaseError (one line) when it cannot be used."""
    engine = create_db_engine(url)
    try:
        migrate(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise DatabaseError(
            f"the hub database {redact_urls(url)} cannot be used: {describe(exc)}"
        ) from None
    return engine


def describe(exc: SQLAlchemyError) -> str:
    """A database error in one line, without SQL or parameters."""
    original = getattr(exc, "orig", None)
    text = str(original if original is not None else exc).strip().splitlines()
    return redact_urls(text[0] if text else type(exc).__name__)


def insert(connection: sa.Connection, table: sa.Table) -> Any:
    """An INSERT that knows ``ON CONFLICT`` on this connection's backend (SQLite, PostgreSQL)."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)
