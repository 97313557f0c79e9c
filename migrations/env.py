"""Alembic environment: the URL comes from the caller or from ``RATCHET_*`` settings."""

from __future__ import annotations

from alembic import context

from store.db import make_engine
from store.models import Base
from store.settings import get_settings

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    return config.attributes.get("url") or get_settings().resolved_database_url


def _configure(**kwargs) -> None:
    url = kwargs.pop("url", None) or _url()
    context.configure(
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=url.startswith("sqlite"),
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            sqlite = conn.dialect.name == "sqlite"
            if sqlite:
                _sqlite_foreign_keys(conn, "OFF")
            _configure(connection=conn, url=str(engine.url))
            with context.begin_transaction():
                context.run_migrations()
                if sqlite:
                    _check_foreign_keys(conn)
            conn.commit()
            if sqlite:
                _sqlite_foreign_keys(conn, "ON")
    finally:
        engine.dispose()


def _sqlite_foreign_keys(conn, state: str) -> None:
    """Turn SQLite's foreign-key enforcement on or off for this connection, outside any transaction (inside one
    the pragma does nothing).

    A batch migration that changes a constraint of a table others refer to (``cycles`` in 0006) recreates it:
    a copy, the old table dropped, the copy renamed. With enforcement on, the drop fails on every row that
    refers to the table, though the copy holds the same ids: SQLite's own procedure for such changes
    (https://sqlite.org/lang_altertable.html, "Making Other Kinds Of Table Schema Changes") turns it off for
    the change and checks the references before the commit (``_check_foreign_keys``).
    """
    conn.connection.driver_connection.execute(f"PRAGMA foreign_keys={state}")


def _check_foreign_keys(conn) -> None:
    """Refuse to commit a migration that left a reference to a row that does not exist (SQLite)."""
    from sqlalchemy import text

    broken = conn.execute(text("PRAGMA foreign_key_check")).all()
    if broken:
        raise RuntimeError(f"the migration left {len(broken)} broken foreign key(s), e.g. {tuple(broken[0])}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
