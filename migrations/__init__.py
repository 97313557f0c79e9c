"""Alembic migrations of the store; the only way the schema changes."""
