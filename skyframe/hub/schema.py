"""The hub's tables (SQLAlchemy Core): one definition, read by the queries and the migrations.

Times are seconds since the epoch (floats), as in the stations' events. A station is kept when
its token is revoked (its history stays); ``token_hash`` is then NULL.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

Time = sa.Double
#: a station id, and a 64-bit integer that SQLite still makes an alias of its rowid
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

stations = sa.Table(
    "stations",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(200), nullable=False, unique=True),
    sa.Column("token_hash", sa.String(64), nullable=True, unique=True),  # sha256 hex; NULL: revoked
    sa.Column("created_at", Time, nullable=False),
    sa.Column("revoked_at", Time, nullable=True),
    sa.Column("last_seen", Time, nullable=True),  # the last ingest, as the hub's clock says
    sa.Column("last_sent_at", Time, nullable=True),  # sent_at of that ingest (station's clock)
    sa.Column("last_seq", sa.BigInteger, nullable=True),
    sa.Column("last_status", sa.JSON, nullable=True),
    sa.Column("status_at", Time, nullable=True),
    #: {"pipeline/sink": since} for each sink the last status shows offline or refused
    sa.Column("sinks_down", sa.JSON, nullable=True),
    sa.Column("dead_letters", sa.BigInteger, nullable=False, server_default="0"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("station_id", BigId, sa.ForeignKey("stations.id"), nullable=False),
    sa.Column("event_id", sa.String(64), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("time", Time, nullable=False),
    sa.Column("received_at", Time, nullable=False),
    sa.Column("kind", sa.String(100), nullable=False),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("relpath", sa.Text, nullable=False),
    sa.Column("sink", sa.String(500), nullable=True),
    sa.Column("remote", sa.Text, nullable=True),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True),
    sa.Column("error", sa.String(200), nullable=True),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("meta", sa.JSON, nullable=True),
    sa.UniqueConstraint("station_id", "event_id"),
    sa.Index(None, "station_id", "id"),  # a station's events, paged
    sa.Index(None, "time"),
)

files = sa.Table(
    "files",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("station_id", BigId, sa.ForeignKey("stations.id"), nullable=False),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("sink", sa.String(500), nullable=False),
    sa.Column("relpath", sa.Text, nullable=False),
    sa.Column("name_lower", sa.String(500), nullable=False),  # the file name, for the search
    sa.Column("remote", sa.Text, nullable=True),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("sha256", sa.String(64), nullable=True),
    sa.Column("delivered_at", Time, nullable=False),
    sa.UniqueConstraint("station_id", "pipeline", "sink", "relpath"),
    sa.Index(None, "name_lower"),
    sa.Index(None, "sha256"),
)

flights = sa.Table(
    "flights",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("station_id", BigId, sa.ForeignKey("stations.id"), nullable=False),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("name", sa.String(100), nullable=False),  # the group's name: flight
    sa.Column("key", sa.Text, nullable=False),  # which one: its folder, or its first file's time
    sa.Column("first_seen", Time, nullable=False),
    sa.Column("last_seen", Time, nullable=False),
    sa.Column("complete", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("completed_at", Time, nullable=True),
    sa.Column("files", sa.BigInteger, nullable=True),  # from NAME-complete
    sa.Column("bytes", sa.BigInteger, nullable=True),
    sa.Column("folder", sa.Text, nullable=True),
    # as the station's heartbeat last said (its groups overview): files arrived, files seen
    sa.Column("reported_files", sa.BigInteger, nullable=True),
    sa.Column("reported_seen", sa.BigInteger, nullable=True),
    sa.UniqueConstraint("station_id", "pipeline", "name", "key"),
    sa.Index(None, "last_seen"),
)

flight_files = sa.Table(
    "flight_files",
    metadata,
    sa.Column("flight_id", BigId, sa.ForeignKey("flights.id"), primary_key=True),
    sa.Column("relpath", sa.String(1000), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("delivered_at", Time, nullable=False),
)

commands = sa.Table(
    "commands",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("station_id", BigId, sa.ForeignKey("stations.id"), nullable=False),
    sa.Column("action", sa.String(16), nullable=False),  # pause, resume
    sa.Column("pipeline", sa.String(200), nullable=True),  # None: the whole station
    sa.Column("created_at", Time, nullable=False),
    sa.Column("sent_at", Time, nullable=True),  # first handed to the station
    sa.Column("confirmed_at", Time, nullable=True),
    sa.Column("ok", sa.Boolean, nullable=True),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Index(None, "station_id", "confirmed_at"),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", BigId, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),  # silent, dead-letters, sink-offline
    sa.Column("station", sa.String(200), nullable=False),
    sa.Column("subject", sa.String(500), nullable=False),  # the sink, for sink-offline
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("fired_at", Time, nullable=False),
    sa.Column("cleared_at", Time, nullable=True),
    #: kind|station|subject while the alert is open, NULL once cleared: one open alert each,
    #: whichever hub sees it first (insert-if-absent)
    sa.Column("open_key", sa.String(800), nullable=True, unique=True),
    sa.Column("notified_at", Time, nullable=True),
    sa.Column("cleared_notified_at", Time, nullable=True),
    sa.Index(None, "fired_at"),
)
