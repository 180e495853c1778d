"""The hub's Alembic migrations (run by :func:`skyframe.hub.db.migrate`)."""
