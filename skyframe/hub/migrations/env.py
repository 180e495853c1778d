"""Alembic's entry point: migrate the connection :func:`skyframe.hub.db.migrate` hands over.

There is no ``alembic.ini`` and no logging set-up here: the hub's own logging is in force.
"""

from __future__ import annotations

from alembic import context

from skyframe.hub.schema import metadata

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
