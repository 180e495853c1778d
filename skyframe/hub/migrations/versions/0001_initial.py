"""The first schema: stations, events, files, flights, commands, alerts.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

Time = sa.Double
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "stations",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("revoked_at", Time, nullable=True),
        sa.Column("last_seen", Time, nullable=True),
        sa.Column("last_sent_at", Time, nullable=True),
        sa.Column("last_seq", sa.BigInteger, nullable=True),
        sa.Column("last_status", sa.JSON, nullable=True),
        sa.Column("status_at", Time, nullable=True),
        sa.Column("sinks_down", sa.JSON, nullable=True),
        sa.Column("dead_letters", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id", name="pk_stations"),
        sa.UniqueConstraint("name", name="uq_stations_name"),
        sa.UniqueConstraint("token_hash", name="uq_stations_token_hash"),
    )
    op.create_table(
        "events",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_id", BigId, nullable=False),
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
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(
            ["station_id"], ["stations.id"], name="fk_events_station_id_stations"
        ),
        sa.UniqueConstraint("station_id", "event_id", name="uq_events_station_id_event_id"),
    )
    op.create_index("ix_events_station_id_id", "events", ["station_id", "id"])
    op.create_index("ix_events_time", "events", ["time"])
    op.create_table(
        "files",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_id", BigId, nullable=False),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("sink", sa.String(500), nullable=False),
        sa.Column("relpath", sa.Text, nullable=False),
        sa.Column("name_lower", sa.String(500), nullable=False),
        sa.Column("remote", sa.Text, nullable=True),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("delivered_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_files"),
        sa.ForeignKeyConstraint(
            ["station_id"], ["stations.id"], name="fk_files_station_id_stations"
        ),
        sa.UniqueConstraint(
            "station_id",
            "pipeline",
            "sink",
            "relpath",
            name="uq_files_station_id_pipeline_sink_relpath",
        ),
    )
    op.create_index("ix_files_name_lower", "files", ["name_lower"])
    op.create_index("ix_files_sha256", "files", ["sha256"])
    op.create_table(
        "flights",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("station_id", BigId, nullable=False),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("first_seen", Time, nullable=False),
        sa.Column("last_seen", Time, nullable=False),
        sa.Column("complete", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("completed_at", Time, nullable=True),
        sa.Column("files", sa.BigInteger, nullable=True),
        sa.Column("bytes", sa.BigInteger, nullable=True),
        sa.Column("folder", sa.Text, nullable=True),
        sa.Column("reported_files", sa.BigInteger, nullable=True),
        sa.Column("reported_seen", sa.BigInteger, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_flights"),
        sa.ForeignKeyConstraint(
            ["station_id"], ["stations.id"], name="fk_flights_station_id_stations"
        ),
        sa.UniqueConstraint(
            "station_id", "pipeline", "name", "key", name="uq_flights_station_id_pipeline_name_key"
        ),
    )
    op.create_index("ix_flights_last_seen", "flights", ["last_seen"])
    op.create_table(
        "flight_files",
        sa.Column("flight_id", BigId, nullable=False),
        sa.Column("relpath", sa.String(1000), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("delivered_at", Time, nullable=False),
        sa.PrimaryKeyConstraint("flight_id", "relpath", name="pk_flight_files"),
        sa.ForeignKeyConstraint(
            ["flight_id"], ["flights.id"], name="fk_flight_files_flight_id_flights"
        ),
    )
    op.create_table(
        "commands",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("station_id", BigId, nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("pipeline", sa.String(200), nullable=True),
        sa.Column("created_at", Time, nullable=False),
        sa.Column("sent_at", Time, nullable=True),
        sa.Column("confirmed_at", Time, nullable=True),
        sa.Column("ok", sa.Boolean, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_commands"),
        sa.ForeignKeyConstraint(
            ["station_id"], ["stations.id"], name="fk_commands_station_id_stations"
        ),
    )
    op.create_index(
        "ix_commands_station_id_confirmed_at", "commands", ["station_id", "confirmed_at"]
    )
    op.create_table(
        "alerts",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("station", sa.String(200), nullable=False),
        sa.Column("subject", sa.String(500), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("fired_at", Time, nullable=False),
        sa.Column("cleared_at", Time, nullable=True),
        sa.Column("open_key", sa.String(800), nullable=True),
        sa.Column("notified_at", Time, nullable=True),
        sa.Column("cleared_notified_at", Time, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_alerts"),
        sa.UniqueConstraint("open_key", name="uq_alerts_open_key"),
    )
    op.create_index("ix_alerts_fired_at", "alerts", ["fired_at"])


def downgrade() -> None:
    for table in ("alerts", "commands", "flight_files", "flights", "files", "events", "stations"):
        op.drop_table(table)
